"""Procedural shapes: the data set, its analyser, and the tiny model trained on it.

    kandinsky.data.shapes      pictures + captions of the shapes grammar, from a seed
    kandinsky.data.analyse     what a picture shows (colours, shape, size, position)
    kandinsky.data.evaluate    ``kandinsky eval shapes``: accuracy of a checkpoint on the grammar
    kandinsky.data.train_demo  ``kandinsky train-demo``: reproduce the shipped weights

The shipped checkpoints themselves belong to kandinsky.demo (``demo_folders()``, ``DEMO_WEIGHTS``),
which never imports this package: the arrow runs one way (train_demo reads kandinsky.demo's tiny
configs and hub writer).
"""
