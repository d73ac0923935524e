"""The cascading information chain (CIC): rebuild tau^2..tau^N from tau^1 and the actions.

    a^1 = mu^1(tau^1)
    for i in 1..N-1:  I^{i+1} = TopK(I^i, <a^i, v^i>);  tau^{i+1} = (tau^i, a^i, v^{i+1} over I^{i+1});  a^{i+1} = mu^{i+1}(tau^{i+1})

It is :func:`unexrl.cascade.run_cascade` (the simulator's own selection function) with the actors as the
stage policies, so replay is exact by construction. The same call gives CTDE's view of the data: selection
follows the logged actions (the buffer's downstream observations) while the actors' actions are only recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from unexrl.cascade import CascadeResult, StageView, run_cascade
from unexrl.rl.networks import StageActors
from unexrl.rl.observation import Tau1, candidate_summary


def cascade_with_actors(
    tau: Tau1,
    embedding: Tensor,
    keep: Sequence[int],
    actors: StageActors,
    *,
    stop_gradient: bool,
    select_with: Sequence[Tensor] | None = None,
    perturb: Callable[[Tensor], Tensor] | None = None,
    first_summary: Tensor | None = None,
) -> tuple[CascadeResult, list[Tensor], list[Tensor]]:
    """Run the cascade on ``tau`` with ``actors`` choosing each stage's action.

    Returns the cascade, the actors' actions and each stage view's candidate summary.

    embedding: the actors' embeddings of ``tau`` (``actors.embed``), computed once for every stage.
    stop_gradient: actor i sees sg(a^{<i}) (SG: no gradient path from downstream actors back into mu^i).
    select_with: None for CIC (the actors' actions select the candidates); logged actions for CTDE, which are
        then also the upstream actions each actor sees (its observation is the logged one, whole).
    perturb: applied to each action before use (exploration or target-policy smoothing).
    first_summary: the whole pool's summary when already known (the replay buffer stores it).
    """
    actions: list[Tensor] = []
    summaries: list[Tensor] = []

    def act(view: StageView) -> Tensor:
        # tau^i's upstream actions are those that selected its candidates: the actors' own under CIC, the logged
        # ones under CTDE (a logged observation, as the buffer holds it)
        own = [a.detach() for a in actions] if stop_gradient else list(actions)
        upstream = own if select_with is None else list(view.upstream_actions)
        known = first_summary is not None and view.stage == 0
        summaries.append(first_summary if known else candidate_summary(view.predictions))
        a = actors.act(view.stage, embedding, torch.cat([tau.state, summaries[-1]], dim=1), upstream)
        if perturb is not None:
            a = perturb(a)
        actions.append(a)
        return a if select_with is None else select_with[view.stage]

    return run_cascade(tau.predictions, keep, act), actions, summaries
