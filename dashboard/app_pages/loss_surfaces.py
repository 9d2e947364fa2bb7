"""Loss surfaces: optimization you can watch. For an experiment on 2-D test functions (dataset:
himmelblau, rosenbrock, saddle, ...), the function's contour with the path every trial's point took,
coloured by a parameter (the optimizer by default), one panel per learning rate, the known minima and
saddle points marked, a step slider to replay the descent, and a table of where each run ended."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data, surface_charts, trial_tables, widgets
from services.surfaces import SURFACE_NAMES

NOT_SURFACES = ("Experiment #{id} trains networks on data sets; this page draws 2-D test functions, whose trials "
                "optimize a point directly. Submit `examples/loss_surfaces.yaml` (or choose \"Loss surfaces\" on the "
                "New experiment page) to see every optimizer's path.")
NOTHING_FINISHED = ("No trial of this experiment has finished yet; the paths appear as soon as a worker finishes "
                    "them (start one with `fitscope worker` or `fitscope up`).")
PREFERRED_COLOUR = ("optimizer", "lr", "start", "momentum", "schedule")
PREFERRED_PANELS = ("lr", "start", "momentum", "schedule", "optimizer")
NO_PANELS = "(one panel)"


def summary(trials: pd.DataFrame, function: str) -> str:
    """One sentence: how many runs reached a minimum, a saddle, diverged or ended elsewhere."""
    diverged = int((trials["status"] == "diverged").sum())
    reached = trials.loc[trials["status"] != "diverged", "reached"] if "reached" in trials else pd.Series(dtype=object)
    saddles = int((reached == "saddle").sum())
    minima = int(reached.notna().sum()) - saddles
    elsewhere = len(trials) - diverged - saddles - minima
    distinct = reached[reached.notna() & (reached != "saddle")].nunique()
    return (f"Of the {len(trials)} runs on {function}, **{minima}** ended at a known minimum ({distinct} different "
            f"ones), **{saddles}** at a saddle point, **{elsewhere}** elsewhere (still on the way) and "
            f"**{diverged}** diverged.")


st.title("Loss surfaces")
experiment_id = widgets.experiment_or_stop("surfaces")
all_trials = data.trials(experiment_id)
if "dataset" not in all_trials or not all_trials["dataset"].isin(SURFACE_NAMES).any():
    st.info(NOT_SURFACES.format(id=experiment_id), icon=":material/landscape:")
    st.stop()
trials = trial_tables.groupable(all_trials[all_trials["dataset"].isin(SURFACE_NAMES)])
trained = trials[trials["status"].isin(widgets.TRAINED)]
if trained.empty:
    st.info(NOTHING_FINISHED, icon=":material/hourglass_empty:")
    st.stop()

functions = [name for name in SURFACE_NAMES if name in set(trained["dataset"])]
choices = [name for name in widgets.grouping_choices(trials) if name != "dataset"] or ["ordinal"]
function_column, colour_column, panel_column = st.columns(3)
function = function_column.selectbox("Function", functions, key="surfaces_function")
colour = widgets.parameter_picker("Colour by", choices, key="surfaces_colour", preferred=PREFERRED_COLOUR,
                                  container=colour_column)
panel_options = [NO_PANELS, *[name for name in choices if name != colour]]
panel_start = next((name for name in PREFERRED_PANELS if name in panel_options), NO_PANELS)
panel_by = panel_column.selectbox("One panel per", panel_options, index=panel_options.index(panel_start),
                                  key="surfaces_panels")
shown = trained[trained["dataset"] == function]
paths = {trial_id: kinds["path_2d"] for trial_id, kinds in data.artifacts(
    tuple(int(i) for i in shown["trial_id"])).items() if "path_2d" in kinds}
last_step = max((path["step"][-1] for path in paths.values()), default=0)
step = st.slider("Step", min_value=0, max_value=max(1, last_step), value=max(1, last_step), key="surfaces_step",
                 help="Replay the descent: every path drawn up to this optimizer step (one step per epoch).")

st.markdown(summary(shown, function))
panels = None if panel_by == NO_PANELS else panel_by
if panels is not None and (sentence := widgets.single_value(shown, panels, vary=f"vary {panels} to compare panels")):
    st.caption(sentence)
    panels = None
labels = widgets.trial_labels(shown, [name for name in choices if name in shown])
st.plotly_chart(surface_charts.surface_paths(shown, paths, function=function, color_by=colour, panel_by=panels,
                                             step=None if step >= last_step else step, titles=labels),
                key="surfaces_chart")
st.caption("Open circle: the start; filled dot: where the point is at this step. Gold stars: known minima; black "
           "crosses: saddle points. Contour levels are log-spaced (lighter is lower); paths that diverged leave the "
           "picture. Hover a path for its trial.")

st.subheader("Where each run ended")
varying = [name for name in choices if name in shown and name != "ordinal"]
table = surface_charts.ends_table(shown, varying)
st.dataframe(table, hide_index=True, key="surfaces_table", column_config={
    "final_x": st.column_config.NumberColumn("final x", format="%.4f"),
    "final_y": st.column_config.NumberColumn("final y", format="%.4f"),
    "final_value": st.column_config.NumberColumn("value there", format="%.3g"),
    "distance_to_minimum": st.column_config.NumberColumn("distance to nearest minimum", format="%.2g"),
    "epochs_done": st.column_config.NumberColumn("steps"),
})
