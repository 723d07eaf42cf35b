"""larpo-ray: LLM alignment as retriever preference optimization (LARPO) on Ray.

Kept lean on purpose: importing the package imports nothing heavy. See `larpo_ray/run.py`.
"""

__version__ = "0.1.0"
