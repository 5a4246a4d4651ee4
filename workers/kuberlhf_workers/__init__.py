"""The Ray-side training program: driver, rollout, trainers, rewards, weight sync."""
