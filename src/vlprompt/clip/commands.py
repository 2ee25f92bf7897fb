"""``vlprompt predict`` (zero-shot with a backbone)."""


def register(sub) -> None:
    pass
