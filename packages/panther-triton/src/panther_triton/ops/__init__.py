"""One folder per op: naive.py (the definition, for tests), forward.py / backward.py (kernels and their
launchers), plan.py (how the work is split over programs), op.py (torch.library registration, autograd)."""
