"""Training: the training and evaluation loops and the graceful stop (`loop`), building a run (`setup`)."""
