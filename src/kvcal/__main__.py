"""`python -m kvcal`."""

from kvcal.cli import main

if __name__ == "__main__":
    main()
