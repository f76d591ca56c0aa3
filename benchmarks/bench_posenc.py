"""The posenc benchmark (`fastattn.bench.posenc`); also run by `fastattn-bench kernels`."""

from fastattn.bench.posenc import main

if __name__ == "__main__":
    main()
