"""`python -m pcam_prep ...` is `pcam-prep ...`; torchrun starts it this way: `torchrun -m pcam_prep train ...`."""

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
