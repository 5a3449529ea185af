"""MLflow: tracking runs (`tracking.Tracker`) and the pipeline as a pyfunc model (`pyfunc`)."""
