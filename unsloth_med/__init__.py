"""unsloth-med: fine-tune vision-language models on medical images, on one GPU, through Unsloth.

Educational and research use only: not for diagnosis, clinical decision-making or patient care.
"""
__version__ = "0.1.0"
