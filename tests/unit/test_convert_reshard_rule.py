"""When reshard can let DeepSpeed carry the Adam moments, and the reason it gives when it cannot."""


def test_optimizer_carry_rule():
    from kforcing_dist.convert.reshard import optimizer_carry_reason

    lay = lambda tp=1, pp=1, dp=1, z=0: {"tp": tp, "pp": pp, "dp": dp, "zero_stage": z}  # noqa: E731
    assert optimizer_carry_reason(lay(), lay(dp=4)) is None  # ZeRO-0 state is not partitioned over DP
    assert optimizer_carry_reason(lay(dp=2, z=1), lay(dp=2, z=1)) is None
    assert "tp 2->1" in optimizer_carry_reason(lay(tp=2), lay())
    assert "pp 2->1" in optimizer_carry_reason(lay(pp=2), lay())
    assert "ds_to_universal" in optimizer_carry_reason(lay(dp=2, z=2), lay(dp=4, z=2))
    assert "ZeRO stage" in optimizer_carry_reason(lay(z=1), lay(z=2))
