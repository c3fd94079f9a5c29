"""qat.kernels: fused Triton kernels for QuantLinear, behind ``torch.library`` ops.

    ops             qat::dequant_fakequant / quant_codes / quant_linear_fwd / quant_linear_dx /
                    quant_linear_grads (reference on every device, Triton on CUDA, fake impls
                    for torch.compile; a plain inside LoRA goes in as its factors A, B),
                    qat::fwht (the outside WHT adapter's transform z = scale * x H^T), and
                    qat::pack_int32 / unpack_int32 (qat.packing's int32 words)
    triton_kernels  the kernels themselves (imports triton: import lazily)
    hadamard_kernels  the one-pass Walsh-Hadamard transform kernel (imports triton: lazily)
    packing_kernels   the pack / unpack kernels (imports triton: lazily)
    dispatch        use_kernels("auto" | "triton" | "reference") and the layer-facing calls
                    (quant_linear, quant_linear_backward, dense_weight, fwht,
                    quant_codes: the codes export writes, from the forward's own path) and
                    pack_int32 / unpack_int32 (QuantLinear's base, export's words)

docs/KERNELS.md says what is built and which GPU figures are still missing.

Nothing here imports triton at package import.
"""
