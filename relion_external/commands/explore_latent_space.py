"""(placeholder: being implemented in this session)"""


def add_args(p) -> None:
    p.add_argument("output_directory")


def main(args, control) -> None:
    raise NotImplementedError("explore_latent_space is not implemented yet")
