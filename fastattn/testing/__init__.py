"""Testing tools: the Gluon emulator, which runs ``@gluon.jit`` kernels on CPU tensors with their
synchronization checked (see ``fastattn.testing.gluon_emulator``)."""

from .gluon_emulator import DeadlockError, EmulationError, RaceError, gluon_emulate

__all__ = ["DeadlockError", "EmulationError", "RaceError", "gluon_emulate"]
