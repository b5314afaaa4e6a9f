"""`python -m benchmarks.generalise`: see the package's docstring."""

from benchmarks.generalise.cli import main

if __name__ == "__main__":
    main()
