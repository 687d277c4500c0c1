"""The demo application `tether up` runs: frontend → orders → inventory, by name."""
