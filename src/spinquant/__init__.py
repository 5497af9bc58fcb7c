"""spinquant: learned-rotation 4-bit quantization of LLMs."""
