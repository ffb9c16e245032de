package ferry

import ferry.proto.v1.StageKind
import org.apache.spark.ml.Transformer
import org.apache.spark.ml.param.{Param, ParamMap, Params, StringArrayParam}
import org.apache.spark.ml.util.{DefaultParamsReadable, DefaultParamsWritable, Identifiable}
import org.apache.spark.sql.{DataFrame, Dataset, Encoders, SparkSession}
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.catalyst.expressions.{BoundReference, UnsafeProjection}
import org.apache.spark.sql.ferry.InternalFrames
import org.apache.spark.sql.functions.col
import org.apache.spark.sql.types.StructType

/** Params of [[PythonStage]]. */
trait PythonStageParams extends Params {

  /** Name of the Python stage registered on the worker (required). */
  final val stageName: Param[String] = new Param[String](this, "stageName",
    "name of the Python stage registered on the worker (required)", (s: String) => s != null && s.nonEmpty)

  /** JSON object of the stage's params (default `{}`: every param at its default). */
  final val paramsJson: Param[String] = new Param[String](this, "paramsJson",
    "JSON object of the stage's params (default {})", (s: String) => Json.isObject(s))

  /** Columns sent to the stage, in this order (default: empty = all columns). */
  final val inputCols: StringArrayParam = new StringArrayParam(this, "inputCols",
    "columns sent to the stage, in this order (default: all columns)")

  setDefault(paramsJson -> "{}", inputCols -> Array.empty[String])

  def getStageName: String = $(stageName)
  def getParamsJson: String = $(paramsJson)
  def getInputCols: Array[String] = $(inputCols)
}

/**
 * Any Python `map` stage registered on a ferry worker, as a Spark ML `Transformer`.
 *
 * `transformSchema` asks the worker (`Describe`) for the output schema of the input columns and
 * params, so bad params or columns fail on the driver before any data moves. `transform` streams
 * each partition through a pooled worker as Arrow batches and returns the stage's output rows
 * only: input columns are not carried over unless the stage returns them. Works on batch and
 * streaming DataFrames.
 *
 * {{{
 *   val scaled = new PythonStage().setStageName("scale").setParams(Map("factor" -> 2.0)).transform(df)
 * }}}
 */
class PythonStage(override val uid: String) extends Transformer with PythonStageParams with DefaultParamsWritable {

  def this() = this(Identifiable.randomUID("pythonStage"))

  def setStageName(value: String): this.type = set(stageName, value)
  def setParamsJson(value: String): this.type = set(paramsJson, value)
  def setInputCols(value: Array[String]): this.type = set(inputCols, value)

  /** Sets [[paramsJson]] from a map of values (numbers, strings, booleans, sequences, nested maps). */
  def setParams(params: Map[String, Any]): this.type = set(paramsJson, Json.encode(params))

  /** Java-friendly [[setParams]]. */
  def setParams(params: java.util.Map[String, Object]): this.type = set(paramsJson, Json.encode(params))

  private def selectedSchema(schema: StructType): StructType = {
    val cols = $(inputCols)
    if (cols.isEmpty) schema
    else {
      val missing = cols.filterNot(schema.fieldNames.contains)
      if (missing.nonEmpty) {
        throw new SchemaMismatchException($(stageName), s"Input column(s) ${missing.mkString("'", "', '", "'")} " +
          s"of stage '${$(stageName)}' do not exist; the DataFrame has ${schema.fieldNames.mkString(", ")}. " +
          "Fix inputCols or rename the columns.")
      }
      StructType(cols.map(c => schema(c)))
    }
  }

  private def describe(schema: StructType): WorkerClient.Described = {
    if (!isDefined(stageName)) {
      throw new InvalidParamsException("", "PythonStage needs stageName: call setStageName(\"<registered stage>\").")
    }
    val input = selectedSchema(schema)
    val conf = PythonStage.activeConf
    val d = WorkerPool.get(conf).withClient(_.describe($(stageName), $(paramsJson), Some(input)))
    if (d.spec.getKind != StageKind.STAGE_KIND_MAP) {
      throw new InvalidParamsException($(stageName), s"Stage '${$(stageName)}' is a ${d.spec.getKind} stage; " +
        "PythonStage runs map stages only (one output batch per input batch). Use the stage's own wrapper.")
    }
    d
  }

  override def transformSchema(schema: StructType): StructType =
    describe(schema).outputSchema.getOrElse(throw new ProtocolException(
      s"The worker's Describe of '${$(stageName)}' returned no output schema for an input schema."))

  override def transform(dataset: Dataset[_]): DataFrame = {
    val d = describe(dataset.schema)
    val params = if (d.paramsJson.nonEmpty) d.paramsJson else $(paramsJson)
    PythonStage.execute(dataset, $(stageName), params, selectedSchema(dataset.schema).fieldNames.toSeq,
      d.outputSchema.get)
  }

  override def copy(extra: ParamMap): PythonStage = defaultCopy(extra)
}

object PythonStage extends DefaultParamsReadable[PythonStage] {

  override def load(path: String): PythonStage = super.load(path)

  /** Settings of the active session, or the defaults outside of one. */
  private[ferry] def activeConf: FerryConf =
    SparkSession.getActiveSession.orElse(SparkSession.getDefaultSession).map(FerryConf.get).getOrElse(FerryConf.defaults)

  /**
   * Streams the columns `cols` of `dataset` through the map stage `stage` on pooled workers and
   * returns its output rows (of `outSchema`, as `Describe` gave it), batch or streaming.
   * `resources` (e.g. a model) are uploaded once per worker. No job runs here, even for a
   * `dataset` with shuffles under adaptive execution: the input's RDD is built by the first action.
   */
  private[ferry] def execute(dataset: Dataset[_], stage: String, params: String, cols: Seq[String],
      outSchema: StructType, resources: Seq[Array[Byte]] = Nil,
      rowsIn: Option[org.apache.spark.util.LongAccumulator] = None): DataFrame = {
    val conf = FerryConf.get(dataset.sparkSession)
    val selected = dataset.select(cols.map(c => col(s"`$c`")): _*)
    val inSchema = selected.schema
    if (dataset.isStreaming) {
      selected.mapPartitions { rows =>
        val toInternal = ArrowBatches.internalConverter(inSchema)
        runPartition(conf, stage, params, inSchema, rows.map(toInternal), resources)(
          (reader, msg) => reader.externalRows(msg))
      }(Encoders.row(outSchema))
    } else {
      val spark = dataset.sparkSession
      val rdd = new DeferredRDD(spark.sparkContext, () => {
        val input = selected.queryExecution.toRdd
        WorkerPool.prestartLocal(spark, conf, input.getNumPartitions)
        input.mapPartitions { rows =>
          val counted = rowsIn.fold(rows)(acc => rows.map { r => acc.add(1); r })
          ArrowBatches.rows(runPartition(conf, stage, params, inSchema, counted, resources)(
            (reader, msg) => Iterator.single(reader.load(msg))))
        }
      })
      InternalFrames.create(spark, rdd, outSchema)
    }
  }

  /**
   * Streams each group of rows of `dataset` with equal `keys` through the group stage `stage`,
   * one Run per group: the rows are shuffled by the keys (`spark.sql.shuffle.partitions`) and
   * sorted within partitions, so a group's rows arrive together. Like [[execute]], it runs no job:
   * the shuffle runs in the first action.
   */
  private[ferry] def executeGrouped(dataset: Dataset[_], stage: String, params: String, cols: Seq[String],
      keys: Seq[String], outSchema: StructType): DataFrame = {
    val conf = FerryConf.get(dataset.sparkSession)
    val selected = dataset.select(cols.map(c => col(s"`$c`")): _*)
      .repartition(keys.map(k => col(s"`$k`")): _*).sortWithinPartitions(keys.map(k => col(s"`$k`")): _*)
    val inSchema = selected.schema
    val keyOrdinals = keys.map(k => inSchema.fieldIndex(k))
    val spark = dataset.sparkSession
    val rdd = new DeferredRDD(spark.sparkContext, () => selected.queryExecution.toRdd.mapPartitions { rows =>
      val keyOf = UnsafeProjection.create(keyOrdinals.map(i => BoundReference(i, inSchema(i).dataType,
        inSchema(i).nullable)))
      // The scan reuses its row objects; a group is told apart by a copy of its first key.
      val it = rows.map(_.copy()).buffered
      val runner = new StageRunner(conf, stage)
      val groups = new Iterator[Iterator[InternalRow]] {
        def hasNext: Boolean = it.hasNext
        def next(): Iterator[InternalRow] = {
          val key = keyOf(it.head).copy()
          val group = new Iterator[InternalRow] {
            def hasNext: Boolean = it.hasNext && keyOf(it.head) == key
            def next(): InternalRow = it.next()
          }
          runner.stream(stage, params, inSchema, group)((reader, msg) => reader.batchRows(msg))
        }
      }
      runner.closingAfter(groups.flatten)
    })
    InternalFrames.create(spark, rdd, outSchema)
  }

  private def runPartition[T](conf: FerryConf, stage: String, paramsJson: String, schema: StructType,
      rows: Iterator[InternalRow], resources: Seq[Array[Byte]])(
      convert: (ArrowBatches.Reader, com.google.protobuf.ByteString) => Iterator[T]): Iterator[T] = {
    val runner = new StageRunner(conf, stage)
    try runner.closingAfter(runner.stream(stage, paramsJson, schema, rows, resources)(convert))
    catch {
      case e: Throwable =>
        runner.close()
        throw e
    }
  }
}
