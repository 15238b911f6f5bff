"""The ``surgery`` command line (typer + rich), installed as ``surgery.cli``.

``surgery.cli.app:app`` is the Typer application and ``main`` its console-script entry point;
each command lives in a module of this package and is registered in ``app.py`` with one line.
Nothing is imported here, so ``import surgery.cli`` stays cheap.
"""
