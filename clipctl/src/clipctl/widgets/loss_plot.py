"""The live loss curve of a run, drawn in the terminal with plotext."""

from __future__ import annotations

from textual_plotext import PlotextPlot


class LossPlot(PlotextPlot):
    def show(self, steps: list[int], losses: list[float], title: str = "train loss") -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        plt.xlabel("step")
        if steps:
            plt.plot(steps, losses, marker="braille")
        self.refresh()
