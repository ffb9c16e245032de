"""The main job (`ferry demo`); filled in below."""


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("not yet")
