"""The attention benchmark (`fastattn.bench.attention`); also run by `fastattn-bench kernels`."""

from fastattn.bench.attention import main

if __name__ == "__main__":
    main()
