"""The ground floor: errors, atomic writes and checked reads, the machine (devices, processes), seeding,
progress bars and where this process stands under torchrun. Nothing here imports the rest of topo."""
