"""The norms benchmark (`fastattn.bench.norms`); also run by `fastattn-bench kernels`."""

from fastattn.bench.norms import main

if __name__ == "__main__":
    main()
