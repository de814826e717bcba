"""What the tests share: job files, CLI runs, reading vectors back, batches."""
