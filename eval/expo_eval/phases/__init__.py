"""What a sweep does with the store's rows once they are generated, one module per phase:
score them, estimate KL, summarize each candidate, ask a judge, run the capability guard."""
