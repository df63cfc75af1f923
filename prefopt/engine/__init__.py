"""What training and evaluation both run: the prepared run (data, models, caches), the forward + loss
step, the reference's log-probs and fit, the KL estimators, and the process-group helpers."""
