"""(placeholder: being implemented in this session)"""


def add_args(p) -> None:
    p.add_argument("output_directory")


def main(args, control) -> None:
    raise NotImplementedError("optimize_inverse_deformations is not implemented yet")
