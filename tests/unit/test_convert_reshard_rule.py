"""How reshard carries the Adam state to a target layout, and the reason it gives when it cannot."""


def test_optimizer_carry_rule():
    from kforcing_dist.convert.reshard import CARRY_FILES, CARRY_RESET, CARRY_UNIVERSAL, optimizer_carry

    lay = lambda tp=1, pp=1, dp=1, z=0: {"tp": tp, "pp": pp, "dp": dp, "zero_stage": z}  # noqa: E731
    assert optimizer_carry(lay(), lay(dp=4)) == (CARRY_FILES, None)  # ZeRO-0 state is not partitioned over DP
    assert optimizer_carry(lay(dp=2, z=1), lay(dp=2, z=1)) == (CARRY_FILES, None)
    for z in (1, 2, 3):  # a DP change under ZeRO goes through DeepSpeed's universal checkpoint
        assert optimizer_carry(lay(dp=2, z=z), lay(dp=4, z=z)) == (CARRY_UNIVERSAL, None)
    assert optimizer_carry(lay(tp=2, dp=2, z=2), lay(tp=2, dp=1, z=2)) == (CARRY_UNIVERSAL, None)
    how, reason = optimizer_carry(lay(tp=2), lay())
    assert how == CARRY_RESET and "tp 2->1" in reason
    assert "pp 2->1" in optimizer_carry(lay(pp=2), lay())[1]
    assert "ZeRO stage" in optimizer_carry(lay(z=1), lay(z=2))[1]
    how, reason = optimizer_carry(lay(pp=2, dp=1, z=1), lay(pp=2, dp=2, z=1))
    assert how == CARRY_RESET and "pipeline" in reason
    how, reason = optimizer_carry(lay(tp=2, dp=1, z=3), lay(tp=2, dp=2, z=3))  # DeepSpeed cannot re-split TP
    assert how == CARRY_RESET and "ZeRO-3 with tp 2" in reason
