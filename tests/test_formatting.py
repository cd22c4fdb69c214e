"""One way to print a percent: what bench's report, the study's tables and run's summary share."""

from cahp_deploy.formatting import percent


def test_percent_by_hand():
    assert percent(0.8123) == "81.2%"
    assert percent(0.8123, unit="") == "81.2"
    assert percent(-0.004, " pp", signed=True) == "-0.4 pp" and percent(0.01, " pp", signed=True) == "+1.0 pp"
    assert percent(None) == "—" and percent(None, missing="n/a") == "n/a"
