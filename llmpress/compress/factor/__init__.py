"""Factorization compressors (low-rank, ROCKET) and the shared knapsack allocator."""
