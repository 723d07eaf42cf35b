"""Process roles, one module each: generator (sampling), reward (scoring), learner (training)."""
