"""Train locally or take part in a federation, with progress, a live plot and a clean Stop.

All work runs in a napari thread worker over the engine's event generators
(``iter_simulation`` for local training, ``FederationClient.iter_join`` for a federation): the
GUI only shows the events. Stop sets an event the worker asks after each event; the worker then
closes the generator (``until_stopped``), i.e. after the current batch, and the last completed
round's model stays on disk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from fedmix_engine.errors import InputError, error_line
from fedmix_engine.site_models import GLOBAL_MODEL, LOCAL_MODEL, LOCAL_RUN
from napari_fedmix.latest_model import latest_model
from napari_fedmix.panel_closing import PanelClosing
from napari_fedmix.pending_edits import pending_edits
from napari_fedmix.workers import make_worker, until_stopped

if TYPE_CHECKING:
    import napari


_WARMED_UP = False


def _warm_up_engine() -> None:
    """One-time imports and torch initialisation, on the GUI thread when the widget opens.

    Done in the worker instead, they hold the GIL while the event loop waits (measured: 200–340 ms
    stalls at the start of the first run). Costs about 2 s once per napari session.
    """
    global _WARMED_UP
    if _WARMED_UP:
        return
    import safetensors.torch
    import tifffile
    import torch

    import fedmix_engine.federation.client
    import fedmix_engine.simulate  # noqa: F401
    from fedmix_engine.model import ModelConfig, build_model

    net = build_model(ModelConfig(base_width=2))
    optimiser = torch.optim.Adam(net.parameters())
    net(torch.zeros(1, 1, 16, 16)).sum().backward()  # first convolution and Adam step: kernel set-up
    optimiser.step()
    _ = (safetensors.torch.save, tifffile.imread)
    _WARMED_UP = True


def _prepare_for_background_training(device: str) -> None:
    """CPU training leaves one core to the GUI: busy-waiting OpenMP threads on every core starve
    the event loop."""
    import os

    import torch

    if device != "cuda":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class ValidationScore:
    """Dice of the round's model on the validation site (the plot's line; the status line, per class too)."""

    round: int
    dice: float
    per_class: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _TrainForm:
    """The panel's fields as Start or Check read them on napari's GUI thread. The worker reads this copy, never
    the widgets: Qt widgets belong to the GUI thread, and a field edited during a run must not change it."""

    site: Path
    validation: str  # a fully labelled site scored each round, or ""
    device: str
    network: str
    rounds: int
    width: int
    size: int
    server: str
    token: str
    ca_cert: str


class TrainWidget(QWidget):
    # the client's retries of a server that does not answer happen inside one step of its generator (for up
    # to an hour): said from the worker thread through this signal, which Qt delivers on the GUI thread
    join_retrying = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.join_retrying.connect(self._on_event)
        _warm_up_engine()
        self.worker = None
        self._closing = PanelClosing(self, on_closed=self.stop)  # its ✕: no training left running unseen
        self.stop_requested = threading.Event()  # Stop: the running worker's, set
        self.history: dict[str, list[tuple[int, float]]] = {"loss": [], "weight": [], "samples used (hundreds)": [],
                                                            "validation Dice": []}
        self.last_checkpoint: Path | None = None
        self.device_note = ""

        self.site = QLineEdit()
        browse = QPushButton("…")
        browse.clicked.connect(self._choose_site)
        self.mode = QComboBox()
        self.mode.addItems(["local (this site only)", "join a federation server"])
        self.server, self.token, self.ca_cert = QLineEdit(), QLineEdit(), QLineEdit()
        self.validation = QLineEdit()
        self.validation.setPlaceholderText("fully labelled site folder (optional)")
        self.validation.setToolTip("Scores each round's model on these images (not trained on). In a federation "
                                   "the scores (image count, mean Dice and IoU) are also sent to the server.")
        self.server.setPlaceholderText("https://server:8765")
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        token_file = QPushButton("…")
        token_file.setToolTip("Read the token from the file the admin gave this site (site.token)")
        token_file.clicked.connect(self._choose_token_file)
        self.ca_cert.setPlaceholderText("certificate to trust (optional)")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        from fedmix_engine.model import known_models

        self.network = QComboBox()  # the row shows only where a package offers another network
        self.network.addItems(known_models())
        self.network.setToolTip("The network trained locally: unet (the paper's), or one an installed package "
                                "offers. In a federation the server chooses it.")
        self.rounds, self.width_spin, self.size = QSpinBox(), QSpinBox(), QSpinBox()
        self.rounds.setRange(1, 1000)
        self.rounds.setValue(10)
        self.width_spin.setRange(2, 128)
        self.width_spin.setSingleStep(2)
        self.width_spin.setValue(16)
        self.size.setRange(32, 1024)
        self.size.setSingleStep(16)
        self.size.setValue(128)
        self.continue_local = QCheckBox("continue the last local run (adds the rounds)")
        self.start_button, self.stop_button = QPushButton("Start"), QPushButton("Stop")
        self.check_button = QPushButton("Check")
        self.check_button.setToolTip("Check the server, its certificate, the token and this site against the "
                                     "federation's model, without training (fedmix-engine join --check)")
        self.check_button.setEnabled(False)  # for a federation
        self.mode.currentIndexChanged.connect(lambda index: self.check_button.setEnabled(
            index == 1 and self.worker is None))
        self.stop_button.setEnabled(False)
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.check_button.clicked.connect(self.check)
        self.round_bar, self.batch_bar = QProgressBar(), QProgressBar()
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        from qtpy.QtSvgWidgets import QSvgWidget

        self.plot = QSvgWidget()
        self.plot.setMinimumHeight(170)

        from napari_fedmix.settings import plugin_defaults

        defaults = plugin_defaults()
        self.device.setCurrentText(defaults["device"])
        self.site.setText(defaults["default_site_folder"])
        form = QFormLayout()
        site_row = QHBoxLayout()
        site_row.addWidget(self.site)
        site_row.addWidget(browse)
        form.addRow("site folder", site_row)
        form.addRow("mode", self.mode)
        form.addRow("server", self.server)
        token_row = QHBoxLayout()
        token_row.addWidget(self.token)
        token_row.addWidget(token_file)
        form.addRow("token", token_row)
        form.addRow("TLS certificate", self.ca_cert)
        form.addRow("validation site", self.validation)
        form.addRow("device", self.device)
        form.addRow("rounds (local)", self.rounds)
        form.addRow("", self.continue_local)
        if self.network.count() > 1:
            form.addRow("network (local)", self.network)
        form.addRow("U-Net width (local)", self.width_spin)
        form.addRow("image size (local)", self.size)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.check_button)
        layout.addLayout(buttons)
        layout.addWidget(QLabel("round"))
        layout.addWidget(self.round_bar)
        layout.addWidget(QLabel("batches this round"))
        layout.addWidget(self.batch_bar)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        _prepare_for_background_training(self.device.currentText())
        site = Path(self.site.text())
        if not self.site.text():
            self.status.setText("choose a site folder first")
            return
        if self.validation.text() and Path(self.validation.text()).resolve() == site.resolve():
            same = InputError("validation site", "is the site being trained, so its Dice would measure "
                                                 "memorisation; choose a separate store with masks")
            self.status.setText(error_line(same))
            return
        pending_edits().request_save(site)  # the mask drawn just now trains in this run
        self.history = {k: [] for k in self.history}
        form = self._form()  # read here, on the GUI thread: the worker reads this copy, never the widgets
        stop = threading.Event()
        if self.mode.currentIndex() == 0:
            done = 0
            if self.continue_local.isChecked():
                from fedmix_engine.run_snapshot import snapshot_round

                done = snapshot_round(site / LOCAL_RUN) or 0
                if not done:
                    self.status.setText(error_line(InputError("continue", "this site has no earlier local run to "
                                                              "continue; train once without 'continue'")))
                    return
            generator, total = self._local_events(form, done), done + form.rounds
        else:
            generator, total = self._federation_events(form, stop), 0
        self.round_bar.setRange(0, total)
        self.round_bar.setValue(0)
        self.stop_requested = stop
        self.worker = make_worker(until_stopped, generator, stop, on_error=self._on_error)
        self.worker.yielded.connect(self._on_event)
        self.worker.finished.connect(self._on_finished)
        self.start_button.setEnabled(False)
        self.check_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.device_note = ""  # the engine says which device it chose (SimulationStarted, or on joining)
        self.status.setText("starting…")
        self.worker.start()

    def check(self) -> None:
        """What a join would meet, without training (``FederationClient.iter_check``), said in the status line:
        the server, its certificate and the token are tried before the federation's day."""
        if not self.site.text():
            self.status.setText("choose a site folder first")
            return

        form = self._form()

        def lines():
            from fedmix_engine.federation.client import CHECK_PATIENCE

            with self._client(form, give_up_after=CHECK_PATIENCE) as client:
                yield from client.iter_check()

        passed: list[str] = []  # shown as they pass; a failure below them, as join --check prints it

        def failed(exc: Exception) -> None:
            self.status.setText("\n".join([*passed, error_line(exc)]))

        self.stop_requested = threading.Event()  # the panel's ✕ during a check
        self.worker = make_worker(until_stopped, lines(), self.stop_requested, on_error=failed)
        self.worker.yielded.connect(lambda line: (passed.append(line), self.status.setText("\n".join(passed))))
        self.worker.returned.connect(lambda _: self.status.setText(
            "\n".join([*passed, "check passed: Start takes part in the federation"])))
        self.worker.finished.connect(self._on_checked)
        for button in (self.start_button, self.check_button):
            button.setEnabled(False)
        self.status.setText("checking the server, the token and this site…")
        self.worker.start()

    def _on_checked(self) -> None:
        self.worker = None
        self.start_button.setEnabled(True)
        self.check_button.setEnabled(self.mode.currentIndex() == 1)

    def stop(self) -> None:
        """Stop after the current batch (a federation: at once while it waits); the worker then ends the run
        itself (see ``until_stopped``)."""
        if self.worker is not None:
            self.status.setText("stopping after the current batch…")
            self.stop_requested.set()

    def _form(self) -> _TrainForm:
        return _TrainForm(Path(self.site.text()), self.validation.text(), self.device.currentText(),
                          self.network.currentText(), self.rounds.value(), self.width_spin.value(), self.size.value(),
                          self.server.text(), self.token.text().strip(), self.ca_cert.text())

    def _local_events(self, form: _TrainForm, done: int = 0):
        """The local run's events; ``done`` > 0 continues the run in ``SITE/models/local`` after that round."""
        from fedmix_engine.data.site_store import SiteStore
        from fedmix_engine.evaluation import EvalSet, validation_scores
        from fedmix_engine.fedmix.train_config import TrainConfig, default_crop_size
        from fedmix_engine.model import ModelConfig
        from fedmix_engine.simulate import RoundDone, SimulationConfig, iter_simulation

        site = form.site
        with SiteStore.open(site, readonly=True) as store:
            classes, channels = len(store.config.classes), store.config.channels
        if form.validation:  # as a join checks its --eval: full truth, and no copy of a training image
            from fedmix_engine.federation.client import check_held_out

            with SiteStore.open(form.validation, readonly=True) as held_out:
                check_held_out(held_out, site)
        size = form.size
        config = SimulationConfig(method="fedmix", rounds=done + form.rounds, device=form.device,
                                  model=ModelConfig(name=form.network, in_channels=channels, num_classes=classes,
                                                    base_width=form.width),
                                  train=TrainConfig(image_size=size, crop_size=default_crop_size(size),
                                                    batch_size=4))
        self.last_checkpoint = site / LOCAL_MODEL
        validation = EvalSet.from_store(form.validation, size, classes, channels) if form.validation else None
        for event in iter_simulation([site], None, config, site / LOCAL_RUN, overwrite=not done,
                                     resume=bool(done)):
            yield event
            if validation is not None and isinstance(event, RoundDone):
                scores = validation_scores(self.last_checkpoint, validation, config.device)
                yield ValidationScore(event.round, scores["dice"], scores["dice_per_class"])

    def _client(self, form: _TrainForm, give_up_after: float = 3600.0):
        from fedmix_engine.federation.client import FederationClient

        return FederationClient(form.server, form.token, form.site, device=form.device,
                                ca_cert=form.ca_cert or None, give_up_after=give_up_after,
                                held_out=form.validation or None)  # the client scores each global model

    def _federation_events(self, form: _TrainForm, stop: threading.Event):
        self.last_checkpoint = form.site / GLOBAL_MODEL
        # stop is asked between events too: a wait for the other sites yields none for minutes
        with self._client(form) as client:
            yield from client.iter_join(should_stop=stop.is_set, on_retry=self.join_retrying.emit)

    # ------------------------------------------------------------------ events (GUI thread)
    def _on_event(self, event) -> None:
        from fedmix_engine.dice_text import dice_text, shown_loss
        from fedmix_engine.federation.client import JoinEvent
        from fedmix_engine.fedmix.local_update import TrainProgress
        from fedmix_engine.fedmix.pseudo_labels import kept_summary
        from fedmix_engine.simulate import RoundDone, SimulationStarted

        if isinstance(event, SimulationStarted):
            self.device_note = event.note
            self.status.setText(f"training on {event.device}, {event.precision} ({event.note})…")
        progress = event.progress if isinstance(event, JoinEvent) else event
        if isinstance(progress, TrainProgress) and progress.stage == "train":
            self.batch_bar.setRange(0, progress.total)
            self.batch_bar.setValue(progress.step)
        if isinstance(event, ValidationScore):  # after its round's line
            self._add_series("validation Dice", event.round, event.dice)
            self.status.setText(f"{self.status.text()}; validation Dice {dice_text(event.dice, event.per_class)}")
        if isinstance(event, RoundDone):
            site = next(iter(event.n))
            self.round_bar.setValue(event.round)
            self._add_point(event.round, event.losses[site], None, event.n[site])  # one site: its weight is 1
            self.status.setText(f"round {event.round}: loss {shown_loss(event.n[site], event.losses[site])}, "
                                f"{event.n[site]} samples{kept_summary(event.counts.get(site, {}))} "
                                f"({self.device_note})")
        elif isinstance(event, JoinEvent):
            self.status.setText(event.message)
            if event.kind == "evaluated" and event.report:
                self._add_series("validation Dice", event.round, event.report["dice"])
            if event.kind == "round-closed" and event.report:
                self._add_point(event.round, event.report["loss"], event.report["weight"], event.report["n"])
                self.round_bar.setValue(event.round)

    def _add_point(self, r: int, loss: float, weight: float | None, n: int) -> None:
        """One round's figures; ``weight`` is the site's aggregation weight, None when training alone."""
        if n:  # a round that trained on nothing has no loss (it reports 0.0)
            self.history["loss"].append((r, loss))
        if weight is not None:
            self.history["weight"].append((r, weight))
        self._add_series("samples used (hundreds)", r, n / 100)

    def _add_series(self, name: str, r: int, value: float) -> None:
        from fedmix_engine.federation.admin import svg_lines

        self.history[name].append((r, value))
        self.plot.load(svg_lines(self.history, "this site per round").encode())

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(error_line(exc))

    def _on_finished(self) -> None:
        self.start_button.setEnabled(True)
        self.check_button.setEnabled(self.mode.currentIndex() == 1)
        self.stop_button.setEnabled(False)
        if not self.status.text().startswith("error"):
            done = self.last_checkpoint if self.last_checkpoint and self.last_checkpoint.exists() else None
            if done is not None:
                latest_model().announce(done)  # Predict and Batch predict start with it
            # not "stopped" after every last round: only when Stop was asked
            ended = "stopped" if self.stop_requested.is_set() else "finished"
            self.status.setText(f"{self.status.text()}\n{ended}; model: {done or 'none yet'}")
        self.worker = None

    def load_token_file(self, path: str | Path) -> None:
        """Fill the token from the admin's token file (read as ``join --token-file`` reads it: UTF-16 from
        PowerShell, a byte-order mark from Notepad); a clinician had to open it and copy the line by hand. The
        token is not kept anywhere by the panel."""
        from fedmix_engine.federation.tokens import read_token_file, readable_by_others

        try:
            self.token.setText(read_token_file(Path(path)))
        except InputError as exc:
            self.status.setText(error_line(exc))
            return
        warning = readable_by_others(Path(path), "this site's token")
        self.status.setText(f"warning: {warning}" if warning else f"token read from {path}")

    def _choose_token_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Token file from the admin",
                                              filter="Tokens (*.token *.txt);;All files (*)")
        if path:
            self.load_token_file(path)

    def _choose_site(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Site folder")
        if path:
            self.site.setText(path)
