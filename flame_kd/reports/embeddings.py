"""The embeddings reporter: t-SNE and UMAP maps of the test features (beside the teacher's in a
distill run). The slowest reporter of a small run; leave it out of ``--reports`` to skip it."""

from __future__ import annotations

from flame_kd import plots, tracking
from flame_kd.reports.base import ReportContext, reporter


@reporter("embeddings", "plots/tsne.png and plots/umap.png of the test features, and *_student_vs_teacher.png "
          "beside the teacher's", needs=("test", "features", "teacher"))
def embeddings(ctx: ReportContext) -> None:
    """t-SNE, and UMAP where umap-learn is installed, of the model's test features; with a teacher,
    the student's map beside the teacher's."""
    preds = ctx.predictions
    if preds.features is None:
        return
    for method in plots.embedding_methods():
        pts, kept = plots.embed_features(preds.features, method=method, seed=ctx.seed)
        fig = plots.embedding(pts, preds.targets[kept], f"{ctx.title} test features ({method.upper()})")
        tracking.log_figure_to(ctx.run_id, fig, f"plots/{method}.png")
        if ctx.teacher is not None and ctx.kind == "student":
            t_pts, t_kept = plots.embed_features(ctx.teacher_features, method=method, seed=ctx.seed)
            pair = plots.embedding_pair(pts, preds.targets[kept], t_pts, preds.targets[t_kept],
                                        (f"student ({method.upper()})", f"teacher ({method.upper()})"))
            tracking.log_figure_to(ctx.run_id, pair, f"plots/{method}_student_vs_teacher.png")
