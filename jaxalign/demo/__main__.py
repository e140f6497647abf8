"""`python -m jaxalign.demo`: the whole mission offline (see configs/demo.py)."""

from jaxalign.demo.pipeline import main

if __name__ == "__main__":
    main()
