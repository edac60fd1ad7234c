"""batchgap: the large-batch generalization gap, measured."""
__version__ = "0.1.0"
