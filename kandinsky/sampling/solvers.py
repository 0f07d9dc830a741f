"""The newer decoder solvers: DPM-Solver++ 2M (+ Karras sigmas), UniPC (bh2), Euler, Euler ancestral, Heun.

Each is a pure function registered in ``kandinsky.sampling.samplers.SAMPLERS``.
"""
