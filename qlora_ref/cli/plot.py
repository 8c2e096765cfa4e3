"""``qlora plot RUN_DIR``: a fine-tune's curves in one picture (``qlora_ref.train.plot``).

    qlora plot qlora-demo                     # qlora-demo/training.png
    qlora plot out/ --output curves.svg
"""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="plot a fine-tune's training and held-out loss, learning rate and "
                              "gradient norm", description="Draw the curves a run recorded in its log_history.json "
                              "(the --output-dir of qlora finetune or qlora demo): the training loss of every step "
                              "with its running mean, the held-out loss, the learning rate and the gradient norm "
                              "before clipping. Needs matplotlib.")
    p.add_argument("run_dir", type=Path, help="the run's folder (--output-dir of qlora finetune or demo)")
    p.add_argument("--output", type=Path, default=None, help="the picture; its suffix picks the format (.png, .svg, "
                   ".pdf) [default: RUN_DIR/training.png]")
    p.set_defaults(func=run_plot)


def run_plot(args) -> int:
    from qlora_ref.paths import check_figure_file
    from qlora_ref.train.plot import plot_run

    if args.output is not None:  # the default goes in the run's folder, which plot_run checks
        check_figure_file(args.output, "--output")
    out = args.output if args.output is not None else args.run_dir / "training.png"
    log = plot_run(args.run_dir, out)
    print(f"wrote {out}: {sum('loss' in e for e in log)} steps")
    return 0
