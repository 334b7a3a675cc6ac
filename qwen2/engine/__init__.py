"""Generation: sampling, the continuous-batching engine, and the Python front doors."""
