"""`cloudhpc serve submitter`: the agents alone, next to the HPC key, talking to porter over HTTP
(an agent token) or through the S3 mailbox (its objects signed with the mailbox key)."""

from __future__ import annotations

from collections.abc import Mapping

from cloudhpc.config import Settings
from cloudhpc.exceptions import ConfigError
from cloudhpc.runtime.agents import open_agents, submitter_endpoint
from cloudhpc.runtime.servers import until_signalled
from cloudhpc.storage.artifacts import ArtifactWriter, open_agent_object_store
from cloudhpc.submitter.channel import Channel, HttpChannel
from cloudhpc.submitter.s3_channel import count_refusals, open_mailbox_channels

__all__ = ["serve_submitter"]


def _http_channel(settings: Settings) -> HttpChannel:
    token_file = settings.submitter.token_file
    if not token_file.exists():
        raise ConfigError(
            f"submitter.token_file: {token_file} does not exist; create an agent token on porter with "
            "`cloudhpc tokens create --user agent --role agent --cluster NAME` and save it there"
        )
    return HttpChannel(settings.submitter.porter_url, token_file.read_text().strip())


async def serve_submitter(settings: Settings) -> None:
    artifacts = ArtifactWriter(open_agent_object_store(settings))
    channel: Channel | Mapping[str, Channel]
    owned: list[Channel]
    mailboxes = open_mailbox_channels(settings) if settings.submitter.channel == "s3" else {}
    if mailboxes:
        channel = mailboxes  # one per cluster
        owned = list(mailboxes.values())
    else:
        channel = _http_channel(settings)
        owned = [channel]
    try:
        async with submitter_endpoint(settings, required=True) as (metrics, agents):
            count_refusals(mailboxes, metrics)
            async with open_agents(settings, channel, metrics=metrics, artifacts=artifacts, started=agents):
                await until_signalled()
    finally:
        for each in owned:
            await each.close()
