"""One folder per op: forward.py / backward.py (kernels and their launchers), plan.py (how the work is
split over programs), op.py (torch.library registration, autograd). The op's definition, term by term,
is the shared test reference :mod:`panther.testing.naive`."""
