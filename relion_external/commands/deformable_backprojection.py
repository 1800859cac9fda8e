"""(placeholder: being implemented in this session)"""


def add_args(p) -> None:
    p.add_argument("output_directory")


def main(args, control) -> None:
    raise NotImplementedError("deformable_backprojection is not implemented yet")
