"""How weights are held: weight-only int8/int4 layers (int_linear), layers on GGUF's own blocks
(blocks) through our compiled CPU kernels (kernels/), and GPTQ/AWQ checkpoints' own int4
integers (prequantized)."""
