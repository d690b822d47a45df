"""lm: the pure PyTorch library behind lm-pipelines. Never imports prefect, mlflow or flows."""
