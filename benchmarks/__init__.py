"""Performance benchmarks of UniMedVL: inference (prefill, decode, text-to-image, image-to-image, memory) and training
throughput, each figure printed as one JSON line next to the roofline limit measured in the same run.

Run from the repository root: `python -m benchmarks.bench_inference` / `python -m benchmarks.bench_training`
(`--tiny` for the CPU smoke version). See `benchmarks/README.md`.
"""
