"""The early-stopping rule on hand-made loss curves."""

from __future__ import annotations

from dynamight_core.early_stopping import EarlyStopping


def run(values, **kw):
    rule = EarlyStopping(**kw)
    for epoch, value in enumerate(values, start=1):
        if rule.update(epoch, value):
            return epoch, rule
    return None, rule


def test_stops_after_patience_epochs_on_a_plateau():
    curve = [10.0, 8.0, 7.0, 6.5, 6.4] + [6.4] * 10
    stopped, rule = run(curve, patience=3)
    assert stopped == 8 and rule.best_epoch == 5


def test_keeps_going_while_improving_and_never_with_zero_patience():
    decreasing = [10.0 - 0.5 * k for k in range(15)]
    assert run(decreasing, patience=3)[0] is None
    assert run([10.0, 9.0] + [9.0] * 20, patience=0)[0] is None


def test_tiny_improvements_do_not_count():
    # total improvement 4, tolerance 1% of it = 0.04: steps of 0.01 are noise
    curve = [10.0, 6.0] + [6.0 - 0.01 * k for k in range(1, 10)]
    stopped, rule = run(curve, patience=4)
    assert stopped == 6 and rule.best == 6.0


def test_state_round_trip():
    a = EarlyStopping(patience=3)
    for epoch, v in enumerate([5.0, 4.0, 4.0], start=1):
        a.update(epoch, v)
    b = EarlyStopping(patience=3)
    b.load_state_dict(a.state_dict())
    assert b == a
    assert [a.update(4, 4.0), a.update(5, 4.0)] == [b.update(4, 4.0), b.update(5, 4.0)]


def test_never_stops_before_the_minimum_number_of_epochs():
    # a flat start (the deformation model still forming), then learning
    curve = [10.0] * 8 + [9.0, 8.0, 7.0] + [7.0] * 10
    assert run(curve, patience=3)[0] == 4  # without the floor: stopped before learning
    stopped, rule = run(curve, patience=3, min_epochs=10)
    assert stopped == 14 and rule.best_epoch == 11
    stopped, _ = run([10.0] * 30, patience=3, min_epochs=12)
    assert stopped == 12  # a run that never learns still ends


def test_old_states_without_the_new_fields_load():
    rule = EarlyStopping(patience=3, min_epochs=5)
    rule.load_state_dict({"first": 5.0, "best": 4.0, "best_epoch": 2, "stale_epochs": 1})
    assert rule.n_epochs == 0 and rule.best == 4.0
