"""Training: state, optimizer, EMA and the train step."""
