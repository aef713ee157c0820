"""Training: the loop and its graceful stop (`loop`), the evaluation loop (`evaluation`), building a run (`setup`)."""
