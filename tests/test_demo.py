"""The embedded demo end to end, at smoke-test size (the full run is the README's first command)."""

from asymlora.demo import DemoSettings, run_demo


def test_quick_demo_runs_every_method_and_writes_table_and_chart(tmp_path):
    report = run_demo(DemoSettings(out_dir=tmp_path, quick=True))
    for method in ("LoRA specialist", "| LoRA |", "LoRA-MoE", "AsymLoRA", "MixLoRA"):
        assert method in report
    assert "| method | count_digit | count_word | vqa_color | vqa_shape | digits | average |" in report
    chart = tmp_path / "demo.png"
    assert chart.is_file() and chart.stat().st_size > 5000
    assert (tmp_path / "report.md").read_text().strip() == report.strip()
