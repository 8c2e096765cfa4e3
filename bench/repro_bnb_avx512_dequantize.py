"""bitsandbytes 0.50.2 on an AVX-512 CPU: dequantize_4bit scales by the wrong absmax when the last dimension is not
a multiple of the blocksize. Reproduction for upstream (torch + bitsandbytes only): dequantize by hand from the
packed codes and absmax — element i is nibble i (high nibble first) times absmax[i // blocksize] — and compare."""
import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}")
for shape in [(40, 96), (40, 128)]:  # 96 is not a multiple of the blocksize 64 (blocks run across rows); 128 is
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")  # on the CPU, absmax in float32
    flat = packed.flatten()
    codes = torch.stack((flat >> 4, flat & 0xF), dim=1).flatten()[: x.numel()].long()
    by_hand = (state.code[codes] * state.absmax.repeat_interleave(64)[: x.numel()]).reshape(shape)
    error = (F.dequantize_4bit(packed, state) - by_hand).abs().max().item()
    print(f"{shape}: max |dequantize_4bit - by hand| = {error:.3g}; "
          f"max |by hand - x| = {(by_hand - x).abs().max().item():.3g} (the 4-bit quantization error)")
