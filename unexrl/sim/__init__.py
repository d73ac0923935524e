"""The multi-stage recommender simulator: world, retrieval, stage models, user model, sessions."""
