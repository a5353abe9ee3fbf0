"""`cloudhpc serve submitter`: the agents alone, next to the HPC key, talking to porter over HTTP
(an agent token) or through the S3 mailbox (its objects signed with the mailbox key).

Over HTTP without `submitter.object_store`, the agent has no object store of its own: it reads job
inputs and writes artifacts through porter (`submitter/porter_objects.py`), since porter's store is
usually out of its reach (an S3 bucket inside the platform)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from cloudhpc.config import Settings
from cloudhpc.domain.jobs import Job
from cloudhpc.exceptions import ConfigError
from cloudhpc.runtime.agents import open_agents, submitter_endpoint
from cloudhpc.runtime.servers import until_signalled
from cloudhpc.storage.artifacts import ArtifactWriter, open_agent_object_store
from cloudhpc.submitter.channel import Channel, HttpChannel
from cloudhpc.submitter.porter_objects import PorterArtifactWriter, PorterFileFetcher, PorterObjects
from cloudhpc.submitter.s3_channel import count_refusals, open_mailbox_channels

__all__ = ["serve_submitter"]


def _agent_token(settings: Settings) -> str:
    token_file = settings.submitter.token_file.expanduser()  # `~/...` as docs/submitter.md writes it
    if not token_file.exists():
        raise ConfigError(
            f"submitter.token_file: {token_file} does not exist; create an agent token on porter with "
            "`cloudhpc tokens create --user agent --role agent --cluster NAME` and save it there"
        )
    return token_file.read_text().strip()


async def serve_submitter(settings: Settings) -> None:
    channel: Channel | Mapping[str, Channel]
    owned: list[Channel]
    through_porter: PorterObjects | None = None
    fetch_file: Callable[[str, Job], bytes] | None = None
    mailboxes = open_mailbox_channels(settings) if settings.submitter.channel == "s3" else {}
    if mailboxes:
        channel = mailboxes  # one per cluster
        owned = list(mailboxes.values())
    else:
        token = _agent_token(settings)
        channel = HttpChannel(settings.submitter.porter_url, token)
        owned = [channel]
        if settings.submitter.object_store is None:
            through_porter = PorterObjects(settings.submitter.porter_url, token)
            fetch_file = PorterFileFetcher(through_porter).fetch_for
    if through_porter is not None:
        artifacts: ArtifactWriter = PorterArtifactWriter(through_porter)
    else:
        artifacts = ArtifactWriter(open_agent_object_store(settings))
    try:
        async with submitter_endpoint(settings, required=True) as (metrics, agents):
            count_refusals(mailboxes, metrics)
            async with open_agents(
                settings, channel, metrics=metrics, artifacts=artifacts, fetch_file=fetch_file, started=agents
            ):
                await until_signalled()
    finally:
        for each in owned:
            await each.close()
        if through_porter is not None:
            through_porter.close()
